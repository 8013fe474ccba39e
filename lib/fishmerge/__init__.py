"""fishmerge: Fisher-weighted model merging. The core (this package but `tasks` and `flows`) never imports Prefect."""

# 0.2.0: one import name (`fishmerge`, no more `lib`/`tasks`/`flows`), methods as declarations, TIES
# trimming at ⌊density·n⌋; the version is part of merge plan ids and of the search/evaluation cache
# keys, so results of 0.1.0 are not reused.
__version__ = "0.2.0"
