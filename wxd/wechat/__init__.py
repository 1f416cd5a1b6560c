"""The WeChat protocol layer: crypto, XML messages, template value rules, errcodes, the
keep-alive HTTP client and the API clients. Imports nothing from wxd.store or the services."""
