"""The run config, torch-free: all that the workflow (at DAG-build time) and the launcher's waiting process need to
check a run before it is queued. One module per job:

- `evit.config.fields`: a key's `Field` and `check_field`;
- `evit.config.schema`: the sections and keys (`SCHEMA`), and `resolve_config`, which checks a run config and
  fills in every default (the methods' own keys come from `evit.methods`);
- `evit.config.recipes`: the training recipes, the defaults of the recipe-driven train keys;
- `evit.config.io`: reading a config file, ``--set`` overrides, the config hash, resume checks;
- `evit.config.launcher`: the ``launcher:`` section (`evit launch`);
- `evit.config.masking`: the ``mask:`` section (the masking job);
- `evit.config.reference`: the Markdown reference, docs/run_config.md, which ``evit config`` prints.
"""
