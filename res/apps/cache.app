{
    "type": "application",
    "name": "cache",
    "description": "Cache service of the dependency deployer: lookup, entry locks, atomic publish, verify, repair, prune",
    "version": "0.1",
    "mod": ("ion.core.apps.processapp", ["cache", "ion.services.cache.service", "CacheService"], {}),
    "applications": [],
    # Settings live in the "ion.services.cache" section of res/config/ion.config
    # (an app's config would override the user's ionlocal.config).
    "config": {},
}
