"""The two segmentation models (TLM, SSLM), their weights and cards, training and evaluation."""
