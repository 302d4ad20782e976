"""Run by `torchrun --nproc_per_node 2` in test_finetune: fine-tune under DDP (gloo on CPU), write each rank's record.

Rank 1's clock jumps an hour ahead when it draws step 3's batch, so its wall-clock budget is spent there and
rank 0's is not: the processes must still stop together (one that stopped alone would hang the other).
"""

import json
import os
import sys
import time

from cllm_core.runtime.config import FinetuneConfig, ModelConfig
from cllm_core.training.batches import Sampler
from cllm_core.training.finetune import finetune

if os.environ["RANK"] == "1":
    real_clock, real_batch, ahead = time.perf_counter, Sampler.batch, [0.0]

    def batch(self, step):
        if step == 3:
            ahead[0] = 3600.0
        return real_batch(self, step)

    Sampler.batch, time.perf_counter = batch, lambda: real_clock() + ahead[0]

teacher, store, out = sys.argv[1:4]
config = FinetuneConfig(steps=6, batch_size=2, log_every=2, checkpoint_every=2, ar_weight=1.0, max_minutes=30)
record = finetune(config, ModelConfig(name_or_path=teacher), store, out, log=lambda line: None)
metrics = record.metrics
with open(f"{out}.record-{os.environ['RANK']}.json", "w") as file:  # not stdout: the ranks' lines would interleave
    json.dump({"history": record.history, "steps": metrics["train_steps"],
               "stopped_early": metrics["stopped_early"]}, file)
