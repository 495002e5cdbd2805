"""``hpc-kernels doctor``: explain why a kernel does not appear or does not start, with a fix for each."""

from __future__ import annotations

import argparse

HELP = "check everything a kernel needs to appear in Jupyter and start; print a fix for each problem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``doctor``."""
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="kernels to check (default: all of the registry and every installed one)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the checks; exit 1 when any of them failed."""
    # why: commands import what they run when they run (the CLI's start stays light)
    from hpc_kernels import ui
    from hpc_kernels.doctor import base, reporting

    registry, problem = reporting.load_registry(args.registry)
    if args.names and registry is None:
        from hpc_kernels.errors import HpcKernelsError

        raise HpcKernelsError(problem or "no registry found.")
    report = reporting.run_checks(registry, list(args.names), registry_problem=problem)
    if args.json:
        ui.print_json(report.to_json())
        return 1 if report.failed else 0
    out = ui.console()
    marks = {base.OK: "[green]✓[/]", base.WARN: "[yellow]![/]", base.FAIL: "[red]✗[/]"}
    for finding in report.findings:
        who = f"[bold]{ui.esc(finding.kernel)}[/] " if finding.kernel else ""
        out.print(f"{marks[finding.status]} {who}[dim]{finding.check}:[/] ", end="")
        out.print(finding.message, markup=False)
        if finding.fix and finding.status != base.OK:
            out.print("    [cyan]fix:[/] ", end="")
            out.print(finding.fix, markup=False)
    counts = report.to_json()["counts"]
    out.print(f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failed.")
    return 1 if report.failed else 0
