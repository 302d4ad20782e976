"""Run by `torchrun --nproc_per_node 2` in test_finetune: fine-tune under DDP (gloo on CPU), print the record."""

import json
import sys

from cllm_core.config import FinetuneConfig, ModelConfig
from cllm_core.finetune import finetune

teacher, store, out = sys.argv[1:4]
config = FinetuneConfig(steps=4, batch_size=2, log_every=2, checkpoint_every=2, ar_weight=1.0)
record = finetune(config, ModelConfig(name_or_path=teacher), store, out, log=lambda line: None)
print("RECORD " + json.dumps({"history": record["history"], "steps": record["metrics"]["train_steps"]}), flush=True)
