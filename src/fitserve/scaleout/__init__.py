"""Engine replicas behind Ray Serve's HTTP proxy (`pip install fitserve[ray]`; docs/scale-out.md).

`options.py` (flags and their mapping to Ray Serve's deployment options) imports neither ray nor
torch; `replica.py` (the deployment: one engine and the unchanged FastAPI app), `router.py` (the
prefix-affinity request router) and `launch.py` (`fitserve serve --replicas N` and the builder
for `serve run` configs) import ray when they are used.
"""
