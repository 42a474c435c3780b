"""`nnunet-distill publish PACKAGE_DIR URI`: the last stage of a DistillationJob.

Prints the published version as JSON on stdout and leaves the same facts (or the failure reason) in the
pod's termination message, where the operator reads them into `status.artifacts` / the stage condition.
Failures are one line on stderr and exit code 1; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from nnunet_distill.publish import publish
from nnunet_distill.storage import PublishError, RetryPolicy
from nnunet_distill.termination import write_termination_message

PROG = "nnunet-distill publish"


def build_parser() -> argparse.ArgumentParser:
    defaults = RetryPolicy()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Verify a packaged model against its SHA256SUMS, upload it under a new version prefix "
        "of URI, read every object back, then write the _PUBLISHED marker and the LATEST pointer. "
        "Credentials come from the standard env vars (S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_REGION, AWS_ENDPOINT_URL; GOOGLE_* for gs://; AZURE_* for az://).",
    )
    p.add_argument("package_dir", metavar="PACKAGE_DIR", help="directory written by `nnunet-distill package`")
    p.add_argument(
        "uri",
        metavar="URI",
        help="s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX or file:///DIR",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=defaults.max_retries,
        help="retries of each request on 5xx/connection errors, exponential backoff (default %(default)s)",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=defaults.attempts,
        help="whole-file attempts when a transfer or read-back still fails (default %(default)s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.connect_timeout_s,
        metavar="SECONDS",
        help="connect timeout per request (default %(default)s)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log each uploaded file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_retries < 0 or args.attempts < 1 or args.connect_timeout <= 0:
        print(
            f"{PROG}: error: --max-retries must be >= 0, --attempts >= 1 and --connect-timeout > 0",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    policy = RetryPolicy(
        max_retries=args.max_retries, attempts=args.attempts, connect_timeout_s=args.connect_timeout
    )
    try:
        result = publish(args.package_dir, args.uri, env=os.environ, policy=policy)
    except PublishError as err:
        write_termination_message(
            {"stage": "publish", "ok": False, "error": {"reason": err.reason, "message": err.message}}
        )
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    write_termination_message({"stage": "publish", "ok": True, "artifacts": result.artifacts()})
    print(json.dumps(result.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
