"""Where feature values are computed and written: the transforms of each view kind, the trailing
views' per-entity streaming state, the streaming job (bronze -> views), and the writers of the
Delta feature tables and the Redis online store. (Views are declared in ``conf/features``,
loaded by :mod:`pipelines.core.view_spec`.)"""
