# SPDX-License-Identifier: MIT
# bash completion for agent-brokerctl
_agent_brokerctl()
{
        local cur prev words cword
        _init_completion 2>/dev/null || {
                cur=${COMP_WORDS[COMP_CWORD]}
                prev=${COMP_WORDS[COMP_CWORD-1]}
                words=("${COMP_WORDS[@]}")
                cword=$COMP_CWORD
        }
        local commands="token exec keys status whoami policy keygen authenticate introspect attenuate revoke sessions audit review coverage call"
        local global="--socket --admin-socket --timeout --help --version"
        local i cmd="" sub=""
        for ((i = 1; i < cword; i++)); do
                case ${words[i]} in
                --socket|--admin-socket|--timeout) ((i++)) ;;
                -*) ;;
                *) if [[ -z $cmd ]]; then cmd=${words[i]}; elif [[ -z $sub ]]; then sub=${words[i]}; fi ;;
                esac
        done
        case $prev in
        --socket|--admin-socket|--out|--file|--key|--keys|--policy|--pam-dir)
                COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --timeout|--ttl|--max-auth-age|--overlap|--unused-days|--audience|--scope|--task|--env|--jti|--session|--sid|--agent|--before|--since|--event|--user)
                return ;;
        esac
        case $cmd in
        "") COMPREPLY=($(compgen -W "$commands $global" -- "$cur")) ;;
        token) COMPREPLY=($(compgen -W "--audience --scope --ttl --task --json --out --refresh" -- "$cur")) ;;
        exec) COMPREPLY=($(compgen -W "--audience --scope --ttl --env --" -- "$cur")) ;;
        keys) COMPREPLY=($(compgen -W "--jwks --json list rotate --overlap" -- "$cur")) ;;
        status|whoami|authenticate) COMPREPLY=($(compgen -W "--json" -- "$cur")) ;;
        policy)
                case $sub in
                "") COMPREPLY=($(compgen -W "check show reload sign" -- "$cur")) ;;
                check) COMPREPLY=($(compgen -W "--json" -- "$cur") $(compgen -f -- "$cur")) ;;
                sign) COMPREPLY=($(compgen -W "--key" -- "$cur") $(compgen -f -- "$cur")) ;;
                reload|show) COMPREPLY=($(compgen -W "--json" -- "$cur")) ;;
                esac ;;
        keygen) COMPREPLY=($(compgen -W "--out" -- "$cur")) ;;
        introspect) COMPREPLY=($(compgen -W "--audience --scope --max-auth-age --user --json" -- "$cur")) ;;
        attenuate) COMPREPLY=($(compgen -W "--audience --scope --ttl --task --json" -- "$cur")) ;;
        revoke) COMPREPLY=($(compgen -W "--jti --session --token --agent --before --json" -- "$cur")) ;;
        sessions) COMPREPLY=($(compgen -W "--agent --json" -- "$cur")) ;;
        audit)
                if [[ $sub == verify ]]; then COMPREPLY=($(compgen -W "--file --keys" -- "$cur"))
                else COMPREPLY=($(compgen -W "verify --since --agent --event --json --file" -- "$cur")); fi ;;
        review) COMPREPLY=($(compgen -W "--json --csv --unused-days --policy" -- "$cur")) ;;
        coverage) COMPREPLY=($(compgen -W "--pam-dir --policy --json" -- "$cur")) ;;
        call) COMPREPLY=($(compgen -W "--admin io.agentbroker.IssueToken io.agentbroker.Introspect io.agentbroker.WhoAmI org.varlink.service.GetInfo" -- "$cur")) ;;
        esac
}
complete -F _agent_brokerctl agent-brokerctl
