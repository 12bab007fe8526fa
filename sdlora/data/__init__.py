"""Training data: images, where rows come from, the seeded training set, DreamBooth class images."""
