"""Studies: a plan of runs at one equal wall-clock budget, its runner, records and report
(``python tools/study.py --plan examples/study/l10n10.yaml``)."""
