"""A Goodhart lab: real overoptimization of a learned reward model, small enough for a CPU.

Gao et al. 2022's synthetic setup in miniature, built on the spot (no download): a gold
rubric plays the human (:mod:`bon_tracker.lab.gold`), a bag-of-words proxy is trained on K
noisy gold labels (:mod:`bon_tracker.lab.proxy`), a tiny GPT-2 policy is trained against
the proxy with a KL penalty (:mod:`bon_tracker.lab.loop`, or TRL's GRPOTrainer in
:mod:`bon_tracker.lab.trl_lab`) and every eval is logged through the tracker. Needs
``pip install 'bon-tracker[lab]'``; importing this package imports no torch.

>>> from bon_tracker.lab.loop import LabConfig, run_lab  # doctest: +SKIP
>>> result = run_lab(LabConfig(labels=1000, kl_coef=0.02, seed=1), progress=print)  # doctest: +SKIP
>>> result.peaked(), result.first_alert_index - result.peak_index  # doctest: +SKIP
"""
