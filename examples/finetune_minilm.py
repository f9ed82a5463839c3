#!/usr/bin/env python
"""Finetune the pretrained MiniLM with vbpc.IVON on "which corpus is this passage from"; test and OOD metrics.

Same as ``vbpc finetune``; see ``vbpc/recipes/finetune_minilm.py`` (``--help`` for options).
"""

from vbpc.recipes.finetune_minilm import main

if __name__ == "__main__":
    main()
