"""Image concepts shared by the coordinator and the puller: references, registry credentials
and the registry API client. It imports neither of them."""
