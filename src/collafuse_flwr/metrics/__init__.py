"""Evaluation: image quality (fd_classifier, FID, FCD, KID), conditioning, information disclosure and cost.

classifier.py   the offline feature CNN behind fd_classifier / kid_classifier
conditioning.py condition accuracy and own-class share of generated images
features.py     feature networks and the cache of real-image features
distances.py    Fréchet distance and KID on features
disclosure.py   attacks on the cut-point uploads: reconstruction and linkage
audit.py        the disclosure audit of a run (simulation only: it reads the true images)
cost.py         NFEs and FLOPs per party
"""
