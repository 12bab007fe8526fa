"""What a finished run leaves and shares: the weights file, its model card, the Hub upload."""
