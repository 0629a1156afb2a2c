"""Training: the loop pieces every trainer shares, and one trainer module per stage."""
