"""hydra's config groups (pkg://fastreg.configs). Importing the package registers the typed schema that config.yaml
builds on (base_config, fastreg.config), so that every way of composing it finds the schema: fastreg.train's
command line, and hydra's compose API in tests and notebooks."""

import fastreg.config  # noqa: F401
