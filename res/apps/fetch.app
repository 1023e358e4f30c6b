{
    "type": "application",
    "name": "fetch",
    "description": "Fetch service of the dependency deployer: lists and downloads versions from file:, http(s): and s3: repositories, verifies, unpacks and publishes them through the cache",
    "version": "0.1",
    "mod": ("ion.core.apps.processapp", ["fetch", "ion.services.fetch.service", "FetchService"], {}),
    "applications": ["cache", "unpack"],
    # Settings live in the "ion.services.fetch" section of res/config/ion.config
    # (an app's config would override the user's ionlocal.config).
    "config": {},
}
