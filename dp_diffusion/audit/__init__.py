"""`dp-diffusion audit`: empirical lower bounds on a run's epsilon from canaries (white-box and black-box)."""
