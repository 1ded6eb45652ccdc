"""Whether generated images show what was asked for, judged by the fd_classifier feature network
(classifier.py), which is trained on the dataset's class labels or, without classes, on its
attributes:

- condition-accuracy: the share of generated images the network assigns to the requested class
  (condition "class"), or the mean agreement of its predicted attributes (logit > 0) with the
  requested ones (condition "attributes" or "text" on a dataset without classes: CelebA; with
  condition-attributes "group", over the client's group's attributes only). Not computable,
  and not reported, when the clients are unconditional or the network predicts classes while
  the condition is attributes (AwA2's predicates); summary.json says so.
- condition-accuracy-real: the same score of the client's real held-out images for their own
  conditions (the requests are drawn from these): what the network makes of real images, the
  ceiling the generated images are read against.
- condition-accuracy-blind: the best score any predictor that ignores the images reaches on the
  requests: the share of the most requested class, or the mean over the scored attributes of
  the majority value's share. A condition accuracy near it says the network cannot tell the
  requested conditions apart in these images, not that the images show them.
- own-class-share: the share of generated images the network assigns to a class present among
  the client's held-out images (datasets with classes); defined with or without conditions, so
  unconditional runs are compared on it too.

Both are per client; the server's pooled row is their mean over the clients (every client
generates eval-num-samples images).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from collafuse_flwr.config import RunConfig
from collafuse_flwr.metrics.classifier import FeatureClassifier, classifier_accuracy

if TYPE_CHECKING:
    from collafuse_flwr.data.clients import ClientData


def conditioning_metric_names(config: RunConfig, num_classes: int) -> tuple[str, ...]:
    """The conditioning metrics an evaluation reply carries, for a dataset with `num_classes`
    classes (0: attributes only)."""
    names = ("own-class-share",) if num_classes else ()
    if config.condition == "class" or (config.condition in ("attributes", "text") and not num_classes):
        names += ("condition-accuracy", "condition-accuracy-real", "condition-accuracy-blind")
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
    classifier: FeatureClassifier, images: torch.Tensor, requested: torch.Tensor | None, data: ClientData,
    names: tuple[str, ...], columns: torch.Tensor | None = None,
) -> dict[str, float]:
    """The metrics `names` of generated images (n, C, H, W) in [-1, 1] generated for the raw
    conditions `requested` (labels (n,) or attributes (n, A)), for a client whose held-out
    images, their classifier targets and raw conditions are in `data`; `columns` (A,) in
    {0, 1}: the attributes the condition holds (None: all)."""
    scores = {}
    if "condition-accuracy" in names:
        scores["condition-accuracy"] = classifier_accuracy(classifier, images, requested, columns)
        scores["condition-accuracy-real"] = classifier_accuracy(classifier, data.held_out, data.held_out_conditions,
                                                                columns)
        scores["condition-accuracy-blind"] = blind_accuracy(requested, columns)
    if "own-class-share" in names:
        predicted = torch.cat([classifier.logits(batch).argmax(1) for batch in images.split(512)])
        scores["own-class-share"] = float(torch.isin(predicted, data.held_out_targets.unique()).float().mean())
    return scores


def blind_accuracy(requested: torch.Tensor, columns: torch.Tensor | None = None) -> float:
    """The highest condition accuracy a prediction that ignores the images can reach on the
    requests: labels (n,): max_c share of class c; attributes (n, A): the mean over the
    attributes where `columns` (A,) is 1 (None: all) of max(p_a, 1 - p_a), p_a the share of
    requests with attribute a (one constant answer per attribute is best for each)."""
    if requested.ndim == 1:
        return float(torch.bincount(requested).max()) / len(requested)
    share = requested.float().mean(0)
    share = share if columns is None else share[columns.bool()]
    return float(torch.maximum(share, 1 - share).mean())
