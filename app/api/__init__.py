"""The REST API: flask-smorest blueprints, ``/openapi.json`` and Swagger UI at ``/docs``.

The spec is generated from the marshmallow schemas in :mod:`app.schemas`. Swagger UI's assets
come from the ``swagger-ui-bundle`` wheel and are served by us under ``/docs/assets/``: nothing
loads from a CDN.
"""

from __future__ import annotations

from importlib import metadata

from flask import Flask, abort, send_from_directory
from flask_smorest import Api

from app import schemas
from app.settings import Settings

TITLE = "gpu-orchestrator"
#: The distribution whose version the spec's ``info.version`` states.
DISTRIBUTION = "gpu-orchestrator"
ASSETS_URL = "/docs/assets/"
#: The only files /docs/assets serves.
ASSET_FILES = (
    "swagger-ui.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "favicon-16x16.png",
    "favicon-32x32.png",
)


class OrchestratorApi(Api):
    """flask-smorest's Api, documenting our one error shape instead of its own."""

    ERROR_SCHEMA = schemas.ErrorSchema


def api_version() -> str:
    """The installed package's version: the spec documents the code that serves it."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _security(settings: Settings) -> dict:
    """Security schemes, only with auth on: Swagger UI shows an Authorize button for any
    scheme, and with auth off there is nothing to authorize."""
    if not settings.auth.enabled:
        return {}
    header = settings.auth.header_name
    return {
        "securitySchemes": {
            "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": header},
            "BearerKey": {"type": "http", "scheme": "bearer"},
        }
    }


def _drop_unused_schemas(api: Api) -> None:
    """Remove flask-smorest's pagination schema: it registers one for its pagination header
    whether or not a route paginates, and none of ours does (an unused schema only misleads
    a reader of /docs). apispec's ``components.schemas`` is a public dict. A route that starts
    to paginate must drop this call: the spec test fails on a dangling reference."""
    api.spec.components.schemas.pop("PaginationMetadata", None)


def init_app(app: Flask, settings: Settings) -> Api:
    """Register the blueprints and the docs routes on ``app``."""
    from app.api import admin, console, gpu, health

    app.config.update(
        API_TITLE=TITLE,
        API_VERSION=api_version(),
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=ASSETS_URL,
    )
    spec_kwargs = {
        "info": {
            "description": "Hands out GPUs to the services that need them: atomic "
            "leases and a priority queue in Redis."
        },
        "components": _security(settings),
    }
    if settings.auth.enabled:
        spec_kwargs["security"] = [{"ApiKeyHeader": []}, {"BearerKey": []}]
    api = OrchestratorApi(app, spec_kwargs=spec_kwargs)
    api.register_blueprint(health.blp)
    api.register_blueprint(gpu.blp)
    api.register_blueprint(admin.blp)
    app.register_blueprint(console.bp)  # HTML pages and their JSON: not part of the API spec
    _drop_unused_schemas(api)

    @app.get(ASSETS_URL + "<path:filename>")
    def docs_assets(filename: str):
        if filename not in ASSET_FILES:
            abort(404)
        from swagger_ui_bundle import swagger_ui_path

        return send_from_directory(str(swagger_ui_path), filename, max_age=86400)

    app.extensions["gpu_api"] = api
    return api
