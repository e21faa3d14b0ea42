"""One module per exchange (strongSwan ``libcharon/sa/ikev2/tasks``): the
tasks we initiate and the handlers that answer the peer's requests.

    ike_init       IKE_SA_INIT, both roles
    ike_auth       IKE_AUTH and its first child SA
    child_sa       CREATE_CHILD_SA for new children and child rekeys
    ike_rekey      CREATE_CHILD_SA rekeying the IKE SA
    informational  deletes, DPD, RFC 6311 message-ID sync
    dispatch       request -> handler table, built at import (``EXCHANGES``)

They sit above common/ike/sa.py: an IKE SA reaches them only through
``ctx.exchanges``, never by import.
"""
