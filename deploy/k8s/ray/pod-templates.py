"""Print the pod templates of a RayService as Kubernetes PodTemplate documents (for kubernetes-validate).

KubeRay's CRD schema is not among the schemas kubernetes-validate ships, so deploy/ci-check.sh checks
the parts of deploy/k8s/ray/rayservice.yaml that are plain Kubernetes (the head and worker pod
templates) against Kubernetes' own schema; tests/test_scaleout.py checks its serveConfigV2 against
Ray Serve's schema. Usage: python pod-templates.py rayservice.yaml > pods.yaml
"""

import sys

import yaml


def main(path: str) -> None:
    with open(path) as f:
        service = yaml.safe_load(f)
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService", "not a RayService"
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    documents = [{"apiVersion": "v1", "kind": "PodTemplate",
                  "metadata": {"name": f"{service['metadata']['name']}-{name}"}, "template": group["template"]}
                 for name, group in groups]
    yaml.safe_dump_all(documents, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(sys.argv[1])
