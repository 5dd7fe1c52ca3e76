"""The reference QLoRA fine-tune (transformers + peft + bitsandbytes), one module per job.

``config`` (LoopConfig, DataFiles), ``data`` (chats -> packed micro-batches), ``model`` (NF4 checkpoint,
LoRA, merge), ``train`` (the one ``Trainer`` and step schedule every QLoRA loop and the bench use),
``probe`` (the learned fact), ``evaluate`` (lm-eval), ``experiment`` (the whole run, as the suite judges it).
Nothing here imports the harness or knows where the suite keeps its data: paths and meters are passed in.
"""
