"""Evaluation: methods x budgets on a prompt set, judged by a gold reward; the worlds and the demo.

- ``prompts``: prompt sources (files, Hugging Face datasets, the worlds' prompts)
- ``grid``: the ``(method, options)`` grid (``parse_grid``, ``parse_value``, ``budget_label``, ``default_grid``)
- ``gold``: gold rewards (``GoldReward``)
- ``harness``: the loop (``evaluate``) and its progress
- ``records``: results files (the JSONL writer and reader) and the resume protocol of ``generate`` and ``eval``
- ``report``: summaries, win rates, the Markdown table, the reward-versus-compute plot, ``write_results``
- ``worlds``: named worlds (``toy``, ``smollm2``); ``toyworld``: the built-in toy world; ``demo``: ``fastalign demo``

This package imports nothing itself: ``fastalign --help`` reads ``grid``, ``worlds`` and ``demo`` without torch.
"""
