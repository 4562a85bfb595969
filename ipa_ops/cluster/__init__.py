"""Running flows on Ray clusters: Ray Jobs submission (jobs.py) and KubeRay / CronJob renderings (render.py).

Sits above the flow, the outputs' ledger and errors; only the CLI's commands import it.
"""
