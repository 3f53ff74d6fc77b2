"""`serve run apps.studio:app`: the Studio on Ray Serve, configured by SAGE_* variables.

    RAY_AUTH_MODE=disabled serve run apps.studio:app            # demo model, http://127.0.0.1:8000
    SAGE_STUDIO_LLM_MODEL=<task id|name|path> serve run apps.studio:app

The config-file way, `serve run configs/studio.yaml`, is the same app with its settings in YAML.
"""

from sage_ray.serve.app import build_app

app = build_app()
