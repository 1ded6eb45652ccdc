"""CollaFuse: collaborative diffusion models split at a cut point, as a Flower app."""
