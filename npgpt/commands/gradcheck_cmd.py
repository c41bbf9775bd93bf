"""``npgpt gradcheck``: check every registered op's backward against finite differences."""
import sys

import numpy as np


def register(sub):
    p = sub.add_parser("gradcheck", help="check every op's gradient against finite differences (float64)",
                       description="Run a float64 central-difference gradient check over every registered "
                                   "op on random shapes and print a table.")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default 0)")
    p.add_argument("--op", action="append", default=None, metavar="NAME",
                   help="check only ops whose name contains NAME (repeatable)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of |analytic - numeric|")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance, times |numeric|")
    p.set_defaults(func=run)


def run(args):
    from .. import backend
    from ..gradcheck import CHECKS, gradcheck_report
    from .. import opchecks  # noqa: F401  (registers the primitive ops)
    from .. import funcchecks  # noqa: F401  (registers the fused layers)
    names = [n for n in CHECKS if not args.op or any(s in n for s in args.op)]
    if not names:
        print(f"npgpt gradcheck: no op matches {args.op}; ops: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    print(f"gradcheck on {backend.name}, float64, central differences (atol={args.atol}, rtol={args.rtol})")
    header = f"{'op':32s} {'shapes':28s} {'max abs err':>12s} {'max rel err':>12s}  ok"
    print(header)
    print("-" * len(header))
    failed = 0
    worst = 0.0
    for name in names:
        fn, make = CHECKS[name]
        inputs = make(rng)
        shapes = " ".join("x".join(map(str, np.shape(x))) or "()" for x in inputs)
        r = gradcheck_report(fn, inputs, atol=args.atol, rtol=args.rtol)
        failed += not r.ok
        worst = max(worst, r.max_abs_err)
        print(f"{name:32s} {shapes:28s} {r.max_abs_err:12.2e} {r.max_rel_err:12.2e}  {'ok' if r.ok else 'FAIL'}")
    print(f"{len(names) - failed}/{len(names)} ops pass; largest abs error {worst:.2e}")
    return 1 if failed else 0
