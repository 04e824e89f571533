"""``python -m minikernels`` = the ``minikernels`` command."""
import sys

from .cli import main

sys.exit(main())
