from twisted.application.service import ServiceMaker

Dache = ServiceMaker("dache", "dache.tap", "A durable cache served over HTTP/JSON.", "dache")
