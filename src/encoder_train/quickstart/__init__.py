"""The quickstart (`encoder-train demo`): a first run on any machine, no download.

The data's way through it:

  corpus.py      CPython's own documentation (help() topics, standard-library docstrings) -> corpus.txt
  demo.py        the stages: corpus -> tokenizer -> shards -> training -> evaluation -> fine-tuning -> report card
  learned.py     what the demo shows after training: the <mask> loss against word frequencies, words it gets right
  docstrings.py  the demo's fine-tuning task: which part of the standard library a docstring comes from
  report_card.py the last stage: the model and its untrained self on the offline evaluation suite (`eval`'s runner)

It uses the trainer (train, evaluate, finetune, eval) as any user would; nothing in the trainer imports it, only the
cli's `demo` subcommand does.
"""
