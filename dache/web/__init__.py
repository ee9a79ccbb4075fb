"""The HTTP edge: the Klein app and its routes, the site and channel, access control,
health and metrics endpoints.
"""
