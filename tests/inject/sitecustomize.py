"""Imported by every Python process started with this folder on PYTHONPATH (tests/test_launch.py): with
CLLM_TEST_FAIL set, the launched training process of rank 1 fails when it draws step 4's batch, by raising
(`raise`), by a SIGKILL as from the out-of-memory killer (`kill`), or by sleeping for an hour (`hang`). Step 4,
not 3: rank 1 reaches step 4 only through step 3's collectives, which rank 0 joins after it has written step 2's
checkpoint."""

import os

if os.environ.get("RANK") == "1" and os.environ.get("CLLM_TEST_FAIL"):
    import signal

    from cllm_core.training.batches import Sampler

    real_batch = Sampler.batch

    def batch(self, step):
        if step == 4:
            if os.environ["CLLM_TEST_FAIL"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ["CLLM_TEST_FAIL"] == "hang":  # as a process stuck outside the collectives
                import time

                time.sleep(3600)
            raise RuntimeError("injected failure at step 4")
        return real_batch(self, step)

    Sampler.batch = batch
