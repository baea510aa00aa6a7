"""Datasets and images: scanning the three layouts into a manifest of content hashes, decoding images
(every bad file skipped with its reason), and generating small texture datasets for demos and tests."""
