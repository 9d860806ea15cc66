"""Data files that ship with the ``models`` package (see ``README.md`` in this folder).

``gpt-neox-20b-tokenizer.json`` is the GPT-NeoX-20B byte-level BPE tokenizer (50,277
entries), Apache-2.0, by EleutherAI; its licence is ``LICENSE-gpt-neox-20b-tokenizer.txt``.
"""
