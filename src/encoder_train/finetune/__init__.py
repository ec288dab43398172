"""Downstream fine-tuning: judge a pretrained encoder by what it is for.

The data's way through it:

  tasks.py       .tsv (GLUE's layout) / .csv / .jsonl files -> examples (one text or a pair) and labels
  classifier.py  the pretrained encoder + a classification or regression head, pooled as its family does it
  loop.py        finetune(): tokenize, then per seed: AdamW, warmup + linear decay, epochs, the best epoch on
                 the validation file, checkpoints, progress bar and metrics.jsonl
  metrics.py     GLUE's metrics: accuracy, F1, Matthews, Pearson, Spearman
  glue.py        GLUE's tasks (files, columns, metrics, hyper-parameters) and the `glue` command
  export.py      a fine-tuned checkpoint -> RobertaForSequenceClassification / ModernBertForSequenceClassification
"""
