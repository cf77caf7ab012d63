"""Detectors: a machine's normal train features in, anomaly scores of its clips out. No ray here.

Every detector keeps one contract (``Detector``, ``bank/base.py``): ``fit(features, ids, domains=...)`` on a
machine's normal train clips, ``score(features)`` of any clips (higher: more anomalous), ``loo_scores()`` of train
clips with each clip left out of its own score where the detector can (``loo_ids()`` names them), ``save`` and
``load``, and every other capability declared with a default (what it eats, noise-only clips, added normals,
score-time settings, the config it reads). ``features`` says what a detector eats: ``clip`` (one embedding per
clip from the backbone, an n x dim array) or ``frames`` (one T x n_mels log-mel matrix per clip, a list).

- ``registry.py``: config name -> class -> config section, and saved kind -> class (``make_detector``,
  ``load_detector``, and what a config's detector eats, stacks or trains, asked of the classes);
- ``settings.py``: the settings each detector reads (``unread_settings``) and takes at score time;
- ``fusion.py``, ``noise_removed.py``: the detectors built of other detectors.
"""

from asd_ray.bank.base import Detector, DetectorEntry
from asd_ray.detectors.fusion import COMBINE, FusionDetector, combine, znormalise
from asd_ray.detectors.noise_removed import NoiseRemovedDetector
from asd_ray.detectors.registry import (ENTRIES, KINDS, REGISTRY, bank_version, check_bank_folder, configure_detector,
                                        detector_features, detector_names, features_key, frame_settings,
                                        load_detector, make_detector, uses_noise)
from asd_ray.detectors.settings import (DETECTOR_SECTIONS, FIT_SECTIONS, SCORE_SETTINGS, fit_time_keys,
                                        given_score_settings, settings_read, unread_settings)

__all__ = ["COMBINE", "DETECTOR_SECTIONS", "ENTRIES", "FIT_SECTIONS", "KINDS", "REGISTRY", "SCORE_SETTINGS", "Detector",
           "DetectorEntry", "FusionDetector", "NoiseRemovedDetector", "bank_version", "check_bank_folder", "combine",
           "configure_detector", "detector_features", "detector_names", "features_key", "fit_time_keys", "frame_settings",
           "given_score_settings", "load_detector", "make_detector", "settings_read", "unread_settings", "uses_noise",
           "znormalise"]
