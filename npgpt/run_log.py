"""What a training run reports: ``out_dir/log.jsonl``, the progress bar (or nanoGPT's log line), the
loss history, tokens/s and MFU (``RunLog``). Used by ``train.py``'s loop."""
import json
import math
import os
import time

from . import backend
from .costs import mfu_peak

__all__ = ["RunLog"]


class RunLog:
    """What a run reports: ``out_dir/log.jsonl`` (one record per evaluation, {"iter", "train_loss",
    "val_loss", "time"}, and one per log line, {"iter", "loss", "lr", "tokens_per_s", "grad_norm"}
    plus "mfu" when ``model`` is given and "loss_scale" and "skipped_steps" under fp16), the tqdm bar,
    and ``history``, the loss of every step. Step losses stay on the device until the next log line
    reads them all at once. Without the bar (``progress=False``) each log record is also printed as
    nanoGPT prints it: ``iter 100: loss 2.1234, time 52.1ms, tok/s 14,700, mfu 23.1%``.

    MFU as nanoGPT's: model FLOPs per token (6N + 12LHQT, ``GPT.estimate_flops_per_token``) times
    tokens/s over the machine's peak (``costs.mfu_peak``: a float32 GEMM measured once per process
    on the CPU, the GPU's data-sheet dense peak), a fraction; the bar shows it in percent. A GPU not
    in ``costs.GPU_PEAKS_TFLOPS`` gets no MFU (one log line says why) rather than a made-up one."""

    def __init__(self, cfg, iter_num, log, model=None, world_size=1, quiet=False):
        # world_size: data-parallel ranks (tokens/s is global, MFU over their summed peak); quiet: a rank
        # other than 0, which keeps the history (its decisions need it) but writes and shows nothing
        self.cfg, self.log = cfg, log
        self.flops_per_token = self.peak = None
        if model is not None:
            self.flops_per_token = model.estimate_flops_per_token()
            self.peak, source = mfu_peak(cfg.dtype, cfg.tf32)    # no random stream is touched
            if self.peak is None:
                log(f"MFU not reported: {source}")
            else:
                self.peak *= world_size
        self.file = open(os.devnull if quiet else os.path.join(cfg.out_dir, "log.jsonl"), "a")
        self.bar = None
        if cfg.progress and not quiet:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.max_iters, initial=iter_num, unit="it", dynamic_ncols=True)
        self.tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world_size
        self.history, self.pending = [], []
        self.first_non_finite = None     # the iteration of the first logged loss that is inf/nan
        self.t_start = self.t_last = time.time()

    def _write(self, record):
        self.file.write(json.dumps(record) + "\n")

    def evaluation(self, iter_num, losses):
        """Print ``step N: train loss X, val loss Y`` and write the evaluation record."""
        msg = f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        (self.bar.write if self.bar else self.log)(msg)
        self._write({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                     "time": time.time() - self.t_start})
        self.file.flush()

    def step(self, iter_num, loss, lr, opt):
        """Record the step that brought the run to ``iter_num``; every ``log_interval`` steps (and at
        the last) read the pending losses and write a log record."""
        self.pending.append(loss.data)
        if self.bar:
            self.bar.update(1)
        if iter_num % self.cfg.log_interval == 0 or iter_num >= self.cfg.max_iters:
            self._log_line(iter_num, lr, opt)

    def finish(self, iter_num, lr, opt):
        """Write the log record of steps not yet logged (a run stopped early by max_time or patience)."""
        if self.pending:
            self._log_line(iter_num, lr, opt)

    def _log_line(self, iter_num, lr, opt):
        new = [float(v) for v in backend.to_numpy(backend.xp.stack(self.pending))]
        self.history.extend(new)
        if self.first_non_finite is None:
            bad = [i for i, v in enumerate(new) if not math.isfinite(v)]
            if bad:
                self.first_non_finite = iter_num - len(new) + bad[0] + 1
        loss_now = self.history[-1]
        elapsed = time.time() - self.t_last
        self.t_last = time.time()
        steps = len(self.pending)
        tokens_per_s = self.tokens_per_iter * steps / max(elapsed, 1e-9)   # since the last line
        self.pending.clear()
        record = {"iter": iter_num, "loss": loss_now, "lr": lr, "tokens_per_s": tokens_per_s,
                  "grad_norm": float(opt.grad_norm)}
        if self.flops_per_token and self.peak:
            record["mfu"] = self.flops_per_token * tokens_per_s / self.peak
        if opt.mixed:
            record.update(loss_scale=opt.loss_scale, skipped_steps=opt.skipped_steps)
        self._write(record)
        if self.bar:
            postfix = {"loss": f"{loss_now:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tokens_per_s:,.0f}"}
            if "mfu" in record:
                postfix["mfu"] = f"{100 * record['mfu']:.2f}%"
            self.bar.set_postfix(postfix)
        else:     # nanoGPT's line: iter 100: loss 2.1234, time 52.1ms, tok/s 14,700, mfu 23.1%
            line = (f"iter {iter_num}: loss {loss_now:.4f}, time {1e3 * elapsed / steps:.1f}ms, "
                    f"tok/s {tokens_per_s:,.0f}")
            if "mfu" in record:
                line += f", mfu {100 * record['mfu']:.1f}%"
            self.log(line)

    def seconds(self):
        """Seconds since the loop started."""
        return time.time() - self.t_start

    def close(self):
        if self.bar:
            self.bar.close()
        self.file.close()
