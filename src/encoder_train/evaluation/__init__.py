"""`encoder-train eval`: judge encoders the way the field does, on a suite of tasks, offline.

The way through (each box its own module; a new task kind is one file in kinds/ plus one line in KINDS):

    suite.yaml --suite.py--> [TaskConfig]          tasks, each of one kind, its settings checked by that kind
    NAME=PATH  --models.py--> [ModelRow]            a checkpoint, a sharded folder, a run folder (one row per kept
                                                    checkpoint), a Hugging Face folder
    (row, task) --kinds/<kind>.py--> metrics        mlm | classification | retrieval | sts
    metrics --report.py--> report.json, report.md, plots    written as each task finishes; a rerun skips what is done

spec.py holds the contracts between these: TaskConfig, the Kind interface and EvalModel.
"""
