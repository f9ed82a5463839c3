#!/usr/bin/env python
"""Train a CNN on real Fashion-MNIST with vbpc.IVON, AdamW and Pyro Bayes-by-backprop; compare test metrics.

Same as ``vbpc cnn``; see ``vbpc/recipes/fmnist_cnn.py`` (``--help`` for options).
"""

from vbpc.recipes.fmnist_cnn import main

if __name__ == "__main__":
    main()
