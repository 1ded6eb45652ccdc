"""Datasets (digits, CIFAR-10, CelebA, AwA2), their non-IID partitions and each client's share."""

from collafuse_flwr.data.clients import (
    ClientData, client_data, client_indices, image_shape, partition_key, training_images,
)
from collafuse_flwr.data.loaders import data_root, load_table
from collafuse_flwr.data.table import DatasetError, ImageTable

__all__ = [
    "ClientData", "DatasetError", "ImageTable", "client_data", "client_indices", "data_root",
    "image_shape", "load_table", "partition_key", "training_images",
]
