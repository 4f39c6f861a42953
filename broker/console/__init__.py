"""The reviewers' console at ``/console``: server-rendered pages for people (approvers,
auditors, admins), signed in through their people issuer's OpenID Connect provider.

The pages ask the same permission checks (:mod:`broker.api.deps`) and approval rules
(:mod:`broker.approvals.service`) as the API, so a page never offers what the server refuses.
``docs/console.md`` describes setup and the pages.
"""
