"""Get the datasets: python scripts/get_data.py {fashion_mnist,cifar10,nietzsche,shakespeare,all} [--source DIR]"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # works from a checkout without pip install
from trainer.datasets.get_data import main  # noqa: E402

sys.exit(main())
