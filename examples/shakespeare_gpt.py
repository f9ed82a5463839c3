#!/usr/bin/env python
"""Train a character-level GPT-2 with vbpc.IVON on Shakespeare; print the validation loss and a text sample.

Same as ``vbpc gpt``; see ``vbpc/recipes/shakespeare_gpt.py`` (``--help`` for options).
"""

from vbpc.recipes.shakespeare_gpt import main

if __name__ == "__main__":
    main()
