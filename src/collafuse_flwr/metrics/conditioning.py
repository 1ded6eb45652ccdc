"""Whether generated images show what was asked for, judged by the fd_classifier feature network
(classifier.py), which is trained on the dataset's class labels or, without classes, on its
attributes:

- condition-accuracy: the share of generated images the network assigns to the requested class
  (condition "class"), or the mean agreement of its predicted attributes (logit > 0) with the
  requested ones (condition "attributes" or "text" on a dataset without classes: CelebA; with
  condition-attributes "group", over the client's group's attributes only). Not computable,
  and not reported, when the clients are unconditional or the network predicts classes while
  the condition is attributes (AwA2's predicates); summary.json says so.
- own-class-share: the share of generated images the network assigns to a class present among
  the client's held-out images (datasets with classes); defined with or without conditions, so
  unconditional runs are compared on it too.

Both are per client; the server's pooled row is their mean over the clients (every client
generates eval-num-samples images).
"""

from __future__ import annotations

import torch

from collafuse_flwr.config import RunConfig
from collafuse_flwr.metrics.classifier import FeatureClassifier, classifier_accuracy


def conditioning_metric_names(config: RunConfig, num_classes: int) -> tuple[str, ...]:
    """The conditioning metrics an evaluation reply carries, for a dataset with `num_classes`
    classes (0: attributes only)."""
    names = ("own-class-share",) if num_classes else ()
    if config.condition == "class" or (config.condition in ("attributes", "text") and not num_classes):
        names += ("condition-accuracy",)
    return names


def conditioning_note(config: RunConfig, num_classes: int) -> str | None:
    """Why condition-accuracy is not reported, or None when it is."""
    if "condition-accuracy" in conditioning_metric_names(config, num_classes):
        return None
    if config.condition == "none":
        return "not computed: the clients' denoisers are unconditional (condition='none')"
    return ("not computed: the fd_classifier network predicts classes, not the requested attributes "
            "(condition='attributes' on a dataset with classes)")


@torch.no_grad()
def conditioning_scores(
    classifier: FeatureClassifier, images: torch.Tensor, requested: torch.Tensor | None,
    held_out_targets: torch.Tensor, names: tuple[str, ...], columns: torch.Tensor | None = None,
) -> dict[str, float]:
    """The metrics `names` of generated images (n, C, H, W) in [-1, 1] generated for the raw
    conditions `requested` (labels (n,) or attributes (n, A)), for a client whose held-out
    images have the classifier's targets `held_out_targets`; `columns` (A,) in {0, 1}: the
    attributes the condition holds (None: all)."""
    scores = {}
    if "condition-accuracy" in names:
        scores["condition-accuracy"] = classifier_accuracy(classifier, images, requested, columns)
    if "own-class-share" in names:
        predicted = torch.cat([classifier.logits(batch).argmax(1) for batch in images.split(512)])
        scores["own-class-share"] = float(torch.isin(predicted, held_out_targets.unique()).float().mean())
    return scores
