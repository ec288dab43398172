"""What several test modules share, by concern; a test_*.py imports its helpers from here (and its shared fixtures
from conftest.py), never from another test_*.py.

  launch.py         `encoder-train train` as child processes: plain or under torchrun (one launcher), a free port
  train_runs.py     a tiny training config, its command line and environment; one-sentence errors; TensorBoard's steps
  recipes.py        a two-source, three-phase recipe on tiny data, run in-process; metrics.jsonl's records
  hf_models.py      tiny RoBERTa- and ModernBERT-shaped models, checkpoints and batches for parity with transformers
  s3.py             a real S3-compatible server (moto) on localhost
  manifests.py      a shard manifest for a folder of shards, as pretokenize writes one
  finetune_data.py  tiny fine-tuning tasks in every file layout, a tiny checkpoint to start from
  wandb_records.py  what an offline W&B run wrote
"""
