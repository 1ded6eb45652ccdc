"""What the run config needs to know about the datasets: their names, default resolutions,
splits, what they are labelled with and which partitions they allow.

Plain constants that import nothing from the package, so that `config` can read them without
loading the datasets' code (which itself needs `config`).
"""

# Resolution used when image-size = 0: the paper's for CIFAR-10 (32), CelebA and AwA2 (64);
# the 8x8 digits are upsampled to 16.
DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar10": 32, "celeba": 64, "awa2": 64}
DATASETS = tuple(DEFAULT_IMAGE_SIZE)
# Channels of every image the loaders give (the digits are grey; every other source is made RGB)
IMAGE_CHANNELS = {"digits": 1, "cifar10": 3, "celeba": 3, "awa2": 3}
LABELLED_DATASETS = ("digits", "cifar10", "awa2")  # class labels: label-groups, dirichlet
ATTRIBUTE_DATASETS = ("celeba", "awa2")  # binary attributes: attribute-groups
DATASET_SPLITS = ("", "train", "valid", "test", "all")
PARTITIONS = ("label-groups", "dirichlet", "iid", "attribute-groups")
# Partition used when partition = "": classes where the dataset has them, else attributes.
DEFAULT_PARTITION = {"digits": "label-groups", "cifar10": "label-groups", "celeba": "attribute-groups",
                     "awa2": "attribute-groups"}
# Condition used when condition = "": as in the paper, every denoiser is conditional; on the
# class where the dataset has classes, else on the attributes (CelebA).
DEFAULT_CONDITION = {"digits": "class", "cifar10": "class", "celeba": "attributes", "awa2": "class"}
