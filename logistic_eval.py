"""Multinomial logistic regression on frozen features (the MSN / StoP low-shot protocol).

Features standardised with the training subset's statistics; cyanure's multiclass-logistic, l2,
no intercept, ``lambda_1 = lambd / n_train``; a list of ``lambd`` is swept on a held-out part of
the training subset (never the test set), then the best is refit on the whole subset.

    python logistic_eval.py --fname logistic/digits [section.key=value ...]
    python logistic_eval.py --fname ... subset.file=1percent.txt "logistic.lambd=[0.0001,0.001]"

The code is ``ijepa_toolkit.eval.logistic`` (also ``python -m ...``, ``ijepa-logistic``).
"""

import sys

from ijepa_toolkit.eval.logistic import main

if __name__ == "__main__":
    sys.exit(main())
