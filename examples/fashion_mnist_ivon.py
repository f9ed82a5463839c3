#!/usr/bin/env python
"""Train an MLP on real Fashion-MNIST with vbpc.IVON; evaluate the mean and the BMA.

Same as ``vbpc fmnist``; see ``vbpc/recipes/fashion_mnist.py`` (``--help`` for options).
"""

from vbpc.recipes.fashion_mnist import main

if __name__ == "__main__":
    main()
